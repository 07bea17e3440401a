"""Writes data/belle_sample_zh.jsonl: our own Chinese instruction sample in Belle format, for the CPU demo and tests.

Hand-written rows (questions, code, translation, rewriting, summaries, classification, brainstorming) plus rows
generated from templates whose answers are computed here (arithmetic, unit conversion, extraction), so every
answer is correct. Run `python data/make_belle_sample.py` to rebuild the file; the output is deterministic.
"""

import datetime
import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("belle_sample_zh.jsonl")

QA = [
    ("中国的首都是哪座城市？", "中国的首都是北京。"),
    ("一年有多少个月？", "一年有 12 个月。"),
    ("水在标准大气压下的沸点是多少摄氏度？", "在标准大气压下，水的沸点是 100 摄氏度。"),
    ("太阳系中最大的行星是哪一颗？", "太阳系中最大的行星是木星。"),
    ("光合作用需要哪些原料？", "光合作用以二氧化碳和水为原料，在光照下由叶绿体合成有机物并释放氧气。"),
    ("《红楼梦》的作者是谁？", "《红楼梦》的作者一般认为是清代的曹雪芹，后四十回通常认为由高鹗等人续写。"),
    ("地球绕太阳公转一周大约需要多长时间？", "大约需要 365.25 天，也就是一年。"),
    ("人体最大的器官是什么？", "人体最大的器官是皮肤。"),
    ("长江注入哪个海？", "长江最终注入东海。"),
    ("一个星期有几天？", "一个星期有 7 天。"),
    ("世界上面积最大的大洋是哪个？", "世界上面积最大的大洋是太平洋。"),
    ("三角形的内角和是多少度？", "三角形的内角和是 180 度。"),
    ("DNA 的中文全称是什么？", "DNA 的中文全称是脱氧核糖核酸。"),
    ("中国的四大发明是什么？", "中国古代的四大发明是造纸术、印刷术、火药和指南针。"),
    ("月球绕地球一周大约需要多少天？", "月球绕地球公转一周大约需要 27.3 天；从一次满月到下一次满月大约 29.5 天。"),
    (
        "声音在空气中传播得快还是在水中传播得快？",
        "声音在水中传播得更快，约为每秒 1500 米，而在空气中约为每秒 340 米。",
    ),
    ("“床前明月光”的下一句是什么？", "下一句是“疑是地上霜”，出自李白的《静夜思》。"),
    ("中国面积最大的省级行政区是哪个？", "中国面积最大的省级行政区是新疆维吾尔自治区。"),
    ("氧气的化学式是什么？", "氧气的化学式是 O₂。"),
    ("一天有多少分钟？", "一天有 24 × 60 = 1440 分钟。"),
    ("植物的根主要有什么作用？", "根主要用来固定植物，并从土壤中吸收水分和无机盐，有些根还能储存养分。"),
    ("什么是可再生能源？请举两个例子。", "可再生能源是在自然界中可以不断得到补充的能源，例如太阳能和风能。"),
    ("珠穆朗玛峰位于哪两个国家的边界上？", "珠穆朗玛峰位于中国和尼泊尔的边界上。"),
    (
        "为什么天空看起来是蓝色的？",
        "阳光进入大气层后，波长较短的蓝光比红光更容易被空气分子散射，散射光从四面八方进入眼睛，所以天空看起来是蓝色的。",
    ),
    ("端午节是农历的哪一天？", "端午节是农历五月初五。"),
    ("中秋节有什么传统习俗？", "中秋节的传统习俗包括赏月、吃月饼、家人团聚，有些地方还有提灯笼、猜灯谜等活动。"),
    ("计算机中 1 KB 等于多少字节？", "按二进制习惯，1 KB 等于 1024 字节；按国际单位制，1 kB 等于 1000 字节。"),
    ("哺乳动物有什么共同特征？", "哺乳动物一般体表有毛、用肺呼吸、体温恒定，并且用乳汁哺育幼崽。"),
    (
        "什么是二十四节气？",
        "二十四节气是中国古代根据太阳在黄道上的位置划分的 24 个时节，用来指导农事，例如立春、清明、夏至、冬至等。",
    ),
    ("冰融化成水是物理变化还是化学变化？", "是物理变化，因为只是状态改变，没有生成新物质。"),
    ("简要说明什么是通货膨胀。", "通货膨胀是指一段时间内物价总水平持续上涨、货币购买力下降的现象。"),
    ("跑步前为什么要热身？", "热身可以提高体温和心率、增加关节和肌肉的灵活性，从而降低运动受伤的风险。"),
    ("什么是质数？", "质数是大于 1、且只能被 1 和它本身整除的自然数，例如 2、3、5、7、11。"),
    (
        "如何正确洗手？",
        "先用流动的水打湿双手，抹上洗手液或肥皂，揉搓手心、手背、指缝、指尖和手腕至少 20 秒，再用清水冲净并擦干。",
    ),
    ("黄河被称为中华民族的什么？", "黄河被称为中华民族的母亲河。"),
    ("电脑的 CPU 是做什么的？", "CPU 是中央处理器，负责执行程序指令、进行运算和控制计算机各部件协同工作。"),
    ("为什么要垃圾分类？", "垃圾分类可以让可回收物被再利用，减少填埋和焚烧的数量，降低环境污染，也能节约资源。"),
    (
        "请解释“守株待兔”的意思。",
        "“守株待兔”比喻不主动努力，而是心存侥幸、希望得到意外收获，也比喻死守经验、不知变通。",
    ),
    (
        "我们为什么会有四季？",
        "地球自转轴相对公转轨道面是倾斜的，公转时太阳直射点在南北回归线之间移动，各地接收的阳光多少随之变化，于是形成了四季。",
    ),
    ("一个足球队在场上有几名队员？", "比赛时每队在场上有 11 名队员，其中包括 1 名守门员。"),
    ("地球上有几大洲？", "地球上有七大洲：亚洲、非洲、北美洲、南美洲、南极洲、欧洲和大洋洲。"),
    ("中国有多少个省级行政区？", "中国有 34 个省级行政区，包括 23 个省、5 个自治区、4 个直辖市和 2 个特别行政区。"),
    ("闰年的二月有多少天？", "闰年的二月有 29 天，平年的二月有 28 天。"),
    ("什么动物被称为“沙漠之舟”？", "骆驼被称为“沙漠之舟”。"),
    ("人体正常体温大约是多少？", "人体正常体温一般在 36 到 37 摄氏度之间，腋下测量约为 36.5 摄氏度左右。"),
    ("彩虹有哪几种颜色？", "通常说彩虹有七种颜色：红、橙、黄、绿、蓝、靛、紫。"),
    ("为什么铁会生锈？", "铁在潮湿的空气中与氧气和水发生化学反应，生成以氧化铁为主的铁锈。"),
    ("《西游记》中唐僧有几个徒弟？分别是谁？", "唐僧有三个徒弟：孙悟空、猪八戒和沙僧；另外白龙马也常被算作他的徒弟。"),
    ("绿色植物为什么是绿色的？", "因为叶片中的叶绿素主要吸收红光和蓝紫光，而把绿光反射出来。"),
    (
        "什么是人工智能？",
        "人工智能是研究如何让计算机完成通常需要人类智能的任务的学科，例如识别图像、理解语言和做出决策。",
    ),
    (
        "世界上最长的河流是哪条？",
        "一般认为世界上最长的河流是非洲的尼罗河，全长约 6650 千米；也有测量认为南美洲的亚马孙河更长。",
    ),
    (
        "雨是怎么形成的？",
        "地面的水受热蒸发成水蒸气，上升到高空遇冷凝结成小水滴形成云，小水滴相互合并变大，重到空气托不住时就落下来成为雨。",
    ),
]

CODE = [
    (
        "用 Python 写一个函数，判断一个整数是否为偶数。",
        "```python\ndef is_even(n: int) -> bool:\n    return n % 2 == 0\n```",
    ),
    (
        "用 Python 计算列表 [3, 1, 4, 1, 5] 的和。",
        "```python\nnumbers = [3, 1, 4, 1, 5]\nprint(sum(numbers))  # 14\n```",
    ),
    ("写一个 Python 函数，把字符串反转。", "```python\ndef reverse(text: str) -> str:\n    return text[::-1]\n```"),
    (
        "用 Python 读取文本文件 data.txt 的所有行。",
        '```python\nwith open("data.txt", encoding="utf-8") as f:\n    lines = f.read().splitlines()\n```',
    ),
    (
        "写一个 Python 函数，返回列表中的最大值，列表为空时返回 None。",
        "```python\ndef largest(values):\n    return max(values) if values else None\n```",
    ),
    (
        "用 Python 统计一段文字中每个字符出现的次数。",
        "```python\nfrom collections import Counter\n\ncounts = Counter(\"你好你好世界\")\nprint(counts)  # Counter({'你': 2, '好': 2, '世': 1, '界': 1})\n```",
    ),
    (
        "写一个 Python 函数，计算 n 的阶乘。",
        "```python\ndef factorial(n: int) -> int:\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n```",
    ),
    (
        "用 Python 生成 1 到 10 的平方列表。",
        "```python\nsquares = [i * i for i in range(1, 11)]\nprint(squares)  # [1, 4, 9, 16, 25, 36, 49, 64, 81, 100]\n```",
    ),
    (
        "写一个 Python 函数，判断一个字符串是不是回文。",
        "```python\ndef is_palindrome(text: str) -> bool:\n    return text == text[::-1]\n```",
    ),
    (
        "用 Python 把字典按值从大到小排序。",
        "```python\nscores = {\"张三\": 88, \"李四\": 95, \"王五\": 79}\nranked = sorted(scores.items(), key=lambda item: item[1], reverse=True)\nprint(ranked)  # [('李四', 95), ('张三', 88), ('王五', 79)]\n```",
    ),
    ("SQL：从表 students 中查询年龄大于 18 的学生姓名。", "```sql\nSELECT name FROM students WHERE age > 18;\n```"),
    (
        "用 Python 去掉列表中的重复元素并保持原有顺序。",
        "```python\ndef unique(items):\n    return list(dict.fromkeys(items))\n```",
    ),
    (
        "写一个 Python 函数，计算斐波那契数列的第 n 项（从 0 开始）。",
        "```python\ndef fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n```",
    ),
    ("用 Python 获取今天的日期。", "```python\nfrom datetime import date\n\nprint(date.today())\n```"),
    ("用 JavaScript 写一个函数，返回两个数的和。", "```javascript\nfunction add(a, b) {\n  return a + b;\n}\n```"),
    ("解释下面的 Python 代码做了什么：", "这段代码遍历 0 到 4，只打印其中的偶数，输出 0、2、4。"),
    ("下面的 Python 代码有什么错误？", '`print` 语句缺少右括号，应写成 `print("hello")`。'),
    (
        "用 Python 把一个句子按空格拆分成单词列表。",
        "```python\nwords = \"I love machine learning\".split()\nprint(words)  # ['I', 'love', 'machine', 'learning']\n```",
    ),
    (
        "写一个 Python 函数，把摄氏度转换为华氏度。",
        "```python\ndef celsius_to_fahrenheit(c: float) -> float:\n    return c * 9 / 5 + 32\n```",
    ),
    (
        "用 Python 把列表 ['a', 'b', 'c'] 用逗号连接成字符串。",
        '```python\nprint(",".join(["a", "b", "c"]))  # a,b,c\n```',
    ),
]
CODE_INPUTS = {
    "解释下面的 Python 代码做了什么：": "for i in range(5):\n    if i % 2 == 0:\n        print(i)",
    "下面的 Python 代码有什么错误？": 'print("hello"',
}

TRANSLATE_TO_EN = [
    ("今天天气很好。", "The weather is nice today."),
    ("我每天早上七点起床。", "I get up at seven every morning."),
    ("这本书非常有意思。", "This book is very interesting."),
    ("请问火车站怎么走？", "Excuse me, how do I get to the train station?"),
    ("我们下周一开会。", "We have a meeting next Monday."),
    ("他喜欢打篮球和游泳。", "He likes playing basketball and swimming."),
    ("谢谢你的帮助。", "Thank you for your help."),
    ("这家餐厅的菜很好吃。", "The food at this restaurant is delicious."),
    ("我正在学习机器学习。", "I am learning machine learning."),
    ("明天可能会下雨，记得带伞。", "It may rain tomorrow, so remember to bring an umbrella."),
    ("她是一名医生。", "She is a doctor."),
    ("学习一门新语言需要耐心。", "Learning a new language takes patience."),
    ("会议推迟到下午三点。", "The meeting has been postponed to 3 p.m."),
    ("我家有一只猫和两只狗。", "I have a cat and two dogs at home."),
    ("健康比金钱更重要。", "Health is more important than money."),
    ("请把门关上。", "Please close the door."),
    ("这个问题很难回答。", "This question is hard to answer."),
    ("我们一起去公园散步吧。", "Let's go for a walk in the park together."),
]
TRANSLATE_TO_ZH = [
    ("Good morning, how are you?", "早上好，你好吗？"),
    ("I like reading books.", "我喜欢读书。"),
    ("Where is the nearest hospital?", "最近的医院在哪里？"),
    ("Practice makes perfect.", "熟能生巧。"),
    ("The store opens at nine.", "这家商店九点开门。"),
    ("Please speak more slowly.", "请说慢一点。"),
    ("My brother is taller than me.", "我哥哥比我高。"),
    ("It is a beautiful day.", "今天天气真好。"),
    ("Do you want some tea?", "你想喝点茶吗？"),
    ("Knowledge is power.", "知识就是力量。"),
    ("I will call you tomorrow.", "我明天给你打电话。"),
    ("The cat is sleeping on the sofa.", "猫正在沙发上睡觉。"),
    ("Time flies.", "时光飞逝。"),
    ("We need more data.", "我们需要更多数据。"),
    ("Turn left at the second corner.", "在第二个路口左转。"),
]

REWRITE = [
    ("把这句话改写得更正式：", "明天开会别迟到啊。", "请各位于明日准时参加会议。"),
    ("把这句话改写得更礼貌：", "把文件给我。", "麻烦您把文件递给我，谢谢。"),
    ("把下面的句子改成被动句：", "小明打破了窗户。", "窗户被小明打破了。"),
    ("把下面的句子改成把字句：", "我吃完了饭。", "我把饭吃完了。"),
    (
        "把这句话改写得更简洁：",
        "由于今天下雨的原因，所以我们决定把原定的户外活动取消掉。",
        "因为下雨，我们取消了户外活动。",
    ),
    ("修改句子中的错别字：", "我们要坚持锻练身体。", "我们要坚持锻炼身体。"),
    ("修改病句：", "通过这次活动，使我们增长了见识。", "这次活动使我们增长了见识。"),
    ("把这句话改写成疑问句：", "他已经完成作业了。", "他已经完成作业了吗？"),
    ("把这句话改写得更生动：", "花开了。", "一夜之间，满树的花都绽开了笑脸。"),
    ("用更积极的语气改写：", "这个方案有很多问题。", "这个方案还有不少可以改进的地方。"),
    ("把下面的口语改写成书面语：", "这事儿挺难办的。", "此事颇为棘手。"),
    ("修改句子中的错别字：", "他的成绩在班里名列前矛。", "他的成绩在班里名列前茅。"),
    ("把这句话改写得更正式：", "老板，我想请两天假回家。", "经理您好，我想申请两天事假回家处理私事，恳请批准。"),
    ("修改病句：", "我们要发扬和继承优良传统。", "我们要继承和发扬优良传统。"),
    ("把这句话改写成否定句：", "我喜欢吃辣。", "我不喜欢吃辣。"),
    ("把下面的句子扩写得更具体：", "他很努力。", "他每天清晨六点就到图书馆复习，晚上十点才离开，周末也不休息。"),
    ("把这句话改写得更委婉：", "你的报告写得不好。", "你的报告还有一些可以完善的地方，我们一起看看吧。"),
    ("修改句子中的错别字：", "这件事情我们要从长记议。", "这件事情我们要从长计议。"),
    (
        "把下面的长句拆成两个短句：",
        "小王昨天去超市买了很多水果和蔬菜因为他周末要请朋友来家里吃饭。",
        "小王昨天去超市买了很多水果和蔬菜。因为他周末要请朋友来家里吃饭。",
    ),
    ("把这句话改写成感叹句：", "这里的风景很美。", "这里的风景多美啊！"),
]

SUMMARIZE = [
    (
        "小李每天坚持跑步五公里，三个月后体重下降了八斤，睡眠也比以前好了很多。",
        "小李坚持跑步三个月，体重减轻、睡眠改善。",
    ),
    (
        "公司决定从下个月起实行弹性工作制，员工可以在早上七点到十点之间任意时间上班，只要每天工作满八小时即可。",
        "公司下月起实行弹性工作制，员工每天工作满八小时即可，上班时间可在七点到十点之间选择。",
    ),
    (
        "最近几天气温骤降，很多市民出现感冒症状，医生建议大家注意保暖、多喝水，并尽量少去人多的地方。",
        "气温骤降致感冒增多，医生建议保暖、多喝水、少去人多的地方。",
    ),
    (
        "这款手机屏幕大、电池耐用，但是价格偏高，拍照效果在夜间也不够理想。",
        "这款手机屏幕大、续航好，但价格高、夜拍一般。",
    ),
    (
        "图书馆将于本周六进行系统升级，当天暂停借还书服务，周日恢复正常开放。",
        "图书馆周六升级系统，暂停借还书，周日恢复。",
    ),
    (
        "小区物业通知：明天上午九点至十二点停水，请居民提前储水，给大家带来不便敬请谅解。",
        "明天上午九点到十二点小区停水，请提前储水。",
    ),
    (
        "研究人员发现，每天午睡二十分钟左右可以提高下午的注意力和工作效率，但午睡时间过长反而会让人感到昏沉。",
        "研究发现午睡二十分钟左右能提高下午效率，睡太久反而昏沉。",
    ),
    (
        "为了鼓励市民绿色出行，市政府决定在地铁站附近新增两千辆共享单车，并延长部分公交线路的运营时间。",
        "市政府新增共享单车并延长公交运营时间，鼓励绿色出行。",
    ),
    (
        "这部电影讲述了一个普通教师在偏远山村坚守二十年、帮助上百名孩子走出大山的故事，上映后获得了观众的一致好评。",
        "电影讲述乡村教师坚守二十年帮助孩子走出大山，广受好评。",
    ),
    (
        "学校运动会将于十月十五日举行，项目包括跑步、跳远和拔河，各班需在十月八日前提交报名表。",
        "校运动会十月十五日举行，各班须在十月八日前报名。",
    ),
    (
        "由于原材料价格上涨，这家面包店从下周起将部分商品价格上调一元，会员仍可享受九折优惠。",
        "面包店因原料涨价下周起部分商品涨一元，会员仍打九折。",
    ),
    (
        "小张在面试前认真研究了公司的业务，并准备了几个有针对性的问题，面试官对他的表现很满意。",
        "小张面试准备充分，表现令面试官满意。",
    ),
    (
        "专家提醒，长时间看手机会导致眼睛干涩、视力下降，建议每隔半小时休息一下，向远处眺望几分钟。",
        "专家建议看手机每半小时休息远眺，以防眼睛干涩和视力下降。",
    ),
    (
        "这次志愿活动共有一百多名大学生参加，他们为社区老人打扫房间、陪老人聊天，还教他们使用智能手机。",
        "一百多名大学生参加志愿活动，为社区老人打扫、陪聊并教用手机。",
    ),
    (
        "新修的高铁线路将于年底通车，届时两座城市之间的行程时间将从四个小时缩短到一个半小时。",
        "新高铁年底通车，两城行程由四小时缩短至一个半小时。",
    ),
]

SENTIMENT = [
    ("这家店的服务态度太好了，下次还来！", "正面"),
    ("等了一个小时还没上菜，太失望了。", "负面"),
    ("快递很快，包装也很仔细。", "正面"),
    ("手机用了两天就坏了，质量太差。", "负面"),
    ("电影情节紧凑，演员演技在线。", "正面"),
    ("房间又小又吵，晚上根本睡不着。", "负面"),
    ("老师讲得很清楚，我终于听懂了。", "正面"),
    ("客服一直不回复消息，体验很糟。", "负面"),
    ("这本书写得很感人，我看哭了。", "正面"),
    ("价格贵，味道也一般，不推荐。", "负面"),
    ("景色优美，空气清新，非常值得一去。", "正面"),
    ("软件更新以后经常闪退，太烦人了。", "负面"),
    ("产品和描述的一样，性价比很高。", "正面"),
    ("衣服洗了一次就掉色了。", "负面"),
    ("今天的会议按计划在三点开始。", "中性"),
    ("这款耳机音质清晰，戴着也舒服。", "正面"),
]
TOPICS = [
    ("国足在昨晚的比赛中二比一战胜对手。", "体育"),
    ("央行宣布下调存款准备金率零点五个百分点。", "财经"),
    ("新款手机搭载了更快的处理器和更大的电池。", "科技"),
    ("这部电视剧的大结局引发观众热议。", "娱乐"),
    ("教育部发布了今年高考报名的最新通知。", "教育"),
    ("研究人员发现了一种新的抗癌药物靶点。", "医疗健康"),
    ("篮球联赛总决赛将于下周开打。", "体育"),
    ("某科技公司发布了新一代人工智能芯片。", "科技"),
    ("股市今日小幅上涨，成交量有所放大。", "财经"),
    ("多所高校宣布扩大研究生招生规模。", "教育"),
    ("专家提醒冬季要注意预防流感。", "医疗健康"),
    ("知名歌手将在下个月举办巡回演唱会。", "娱乐"),
]

BRAINSTORM = [
    (
        "给出五个周末在家可以做的活动。",
        "1. 读一本好书\n2. 学做一道新菜\n3. 整理房间\n4. 在家做运动，比如瑜伽或跳绳\n5. 和家人一起看电影",
    ),
    (
        "列出三个提高学习效率的方法。",
        "1. 制定明确的学习计划并按时执行\n2. 学习时远离手机，专注一段时间后再休息\n3. 学完后及时复习和做练习巩固",
    ),
    ("为一家新开的咖啡店想三个店名。", "1. 慢时光咖啡\n2. 晨光咖啡馆\n3. 转角遇见"),
    ("列举四种节约用水的方法。", "1. 刷牙时关掉水龙头\n2. 用洗菜水浇花\n3. 缩短洗澡时间\n4. 及时修理漏水的水龙头"),
    (
        "给出三个缓解工作压力的建议。",
        "1. 合理安排任务，分清轻重缓急\n2. 每天抽时间运动或散步\n3. 多和朋友家人交流，说出自己的感受",
    ),
    (
        "想出三个适合小学生的科学小实验。",
        "1. 用醋和小苏打制造“火山喷发”\n2. 用白纸和彩笔观察毛细现象\n3. 用磁铁分辨哪些物品能被吸引",
    ),
    (
        "列出出门旅行前需要检查的五件事。",
        "1. 身份证件和车票\n2. 手机和充电器\n3. 根据天气准备的衣物\n4. 常用药品\n5. 家里的门窗、水电和燃气是否关好",
    ),
    ("给出三个保护视力的习惯。", "1. 看书写字时保持适当距离和充足光线\n2. 每用眼半小时休息并远眺\n3. 多参加户外活动"),
    ("为班级联欢会设计三个游戏。", "1. 你画我猜\n2. 成语接龙\n3. 击鼓传花"),
    ("列举三个减少塑料垃圾的做法。", "1. 购物时自带布袋\n2. 使用可重复使用的水杯\n3. 少点外卖，减少一次性餐具"),
    (
        "给一位刚入职的程序员三条建议。",
        "1. 先读懂项目的代码结构和开发规范\n2. 遇到问题先查资料，再带着思路请教同事\n3. 写代码时同时写测试，保证质量",
    ),
    ("想三个关于环保的宣传标语。", "1. 节约每一滴水，珍惜每一度电\n2. 绿色出行，从我做起\n3. 垃圾分一分，环境美十分"),
    (
        "列出四种常见的健康早餐搭配。",
        "1. 燕麦粥配鸡蛋和水果\n2. 全麦面包配牛奶\n3. 豆浆、包子和一份青菜\n4. 酸奶配坚果和香蕉",
    ),
    (
        "给出三个和家人增进感情的方法。",
        "1. 每周安排一次一起吃饭或出游\n2. 多倾听家人的想法\n3. 在重要的日子准备小惊喜",
    ),
    (
        "列出三个准备面试时要做的事情。",
        "1. 了解公司的业务和岗位要求\n2. 准备自我介绍和常见问题的回答\n3. 提前确认面试时间、地点和着装",
    ),
]

NAMES = ["张伟", "王芳", "李娜", "刘洋", "陈静", "杨磊", "赵敏", "黄强", "周婷", "吴昊"]
CITIES = ["北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "西安", "南京", "重庆"]
ITEMS = [("苹果", "个"), ("铅笔", "支"), ("笔记本", "本"), ("橙子", "个"), ("贴纸", "张")]


def maths(rng: random.Random) -> list[tuple[str, str, str]]:
    rows = []
    for _ in range(20):
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        rows.append((f"计算 {a} × {b} 等于多少？", "", f"{a} × {b} = {a * b}。"))
    for _ in range(10):
        name, (item, unit) = rng.choice(NAMES), rng.choice(ITEMS)
        have, buy, give = rng.randint(5, 30), rng.randint(3, 20), rng.randint(1, 5)
        left = have + buy - give
        rows.append(
            (
                f"{name}有 {have} {unit}{item}，又买了 {buy} {unit}，送给同学 {give} {unit}，现在还有多少{unit}？",
                "",
                f"{have} + {buy} - {give} = {left}，所以{name}现在有 {left} {unit}{item}。",
            )
        )
    for _ in range(8):
        speed, hours = rng.choice([40, 50, 60, 75, 80, 90]), rng.randint(2, 6)
        rows.append(
            (
                f"一辆汽车以每小时 {speed} 千米的速度行驶了 {hours} 小时，一共行驶了多少千米？",
                "",
                f"路程 = 速度 × 时间 = {speed} × {hours} = {speed * hours} 千米。",
            )
        )
    for _ in range(8):
        length, width = rng.randint(3, 20), rng.randint(2, 15)
        rows.append(
            (
                f"一个长方形长 {length} 米、宽 {width} 米，它的面积和周长分别是多少？",
                "",
                f"面积 = {length} × {width} = {length * width} 平方米；周长 = 2 × ({length} + {width}) = "
                f"{2 * (length + width)} 米。",
            )
        )
    for _ in range(8):
        price, off = rng.choice([80, 120, 150, 200, 260, 300]), rng.choice([7, 8, 9])
        rows.append(
            (
                f"一件衣服原价 {price} 元，打 {off} 折后要付多少钱？",
                "",
                f"{off} 折就是原价的 {off * 10}%，{price} × {off / 10:.1f} = {price * off // 10} 元。",
            )
        )
    for _ in range(6):
        numbers = [rng.randint(60, 100) for _ in range(4)]
        total = sum(numbers)
        mean = total / 4
        rows.append(
            (
                "求下面这组数的平均数。",
                "、".join(map(str, numbers)),
                f"总和为 {total}，共 4 个数，平均数 = {total} ÷ 4 = {mean:g}。",
            )
        )
    return rows


def conversions(rng: random.Random) -> list[tuple[str, str, str]]:
    rows = []
    for _ in range(6):
        km = rng.randint(2, 50)
        rows.append((f"{km} 千米等于多少米？", "", f"1 千米 = 1000 米，所以 {km} 千米 = {km * 1000} 米。"))
    for _ in range(6):
        hours = rng.randint(2, 12)
        rows.append((f"{hours} 小时等于多少分钟？", "", f"1 小时 = 60 分钟，所以 {hours} 小时 = {hours * 60} 分钟。"))
    for _ in range(6):
        kg = rng.randint(2, 40)
        rows.append((f"{kg} 千克等于多少克？", "", f"1 千克 = 1000 克，所以 {kg} 千克 = {kg * 1000} 克。"))
    for _ in range(6):
        celsius = rng.choice([0, 10, 20, 25, 30, 35, 40, 100])
        rows.append(
            (
                f"{celsius} 摄氏度等于多少华氏度？",
                "",
                f"华氏度 = 摄氏度 × 9 / 5 + 32 = {celsius} × 9 / 5 + 32 = {celsius * 9 / 5 + 32:g} 华氏度。",
            )
        )
    return rows


def weekdays(rng: random.Random) -> list[tuple[str, str, str]]:
    names = "一二三四五六日"
    rows = []
    for _ in range(12):
        day = datetime.date(2020, 1, 1) + datetime.timedelta(days=rng.randint(0, 3000))
        rows.append(
            (
                f"{day.year}年{day.month}月{day.day}日是星期几？",
                "",
                f"{day.year}年{day.month}月{day.day}日是星期{names[day.weekday()]}。",
            )
        )
    return rows


def extraction(rng: random.Random) -> list[tuple[str, str, str]]:
    rows = []
    for _ in range(16):
        name, city = rng.choice(NAMES), rng.choice(CITIES)
        year, month, day = rng.randint(2015, 2025), rng.randint(1, 12), rng.randint(1, 28)
        amount = rng.randint(2, 90) * 1000
        text = f"{year}年{month}月{day}日，{name}在{city}与合作方签订了一份金额为{amount}元的合同。"
        rows.append(
            (
                "从下面的句子中提取人名、地点、日期和金额。",
                text,
                f"人名：{name}\n地点：{city}\n日期：{year}年{month}月{day}日\n金额：{amount}元",
            )
        )
    for _ in range(8):
        name = rng.choice(NAMES)
        phone = "1" + str(rng.choice([3, 5, 8])) + "".join(str(rng.randint(0, 9)) for _ in range(9))
        text = f"如有疑问，请联系{name}，电话{phone}，工作日九点到五点均可。"
        rows.append(("从下面的文字中提取联系人和电话号码。", text, f"联系人：{name}\n电话号码：{phone}"))
    return rows


def build() -> list[dict]:
    rng = random.Random(2026)
    rows = [(question, "", answer) for question, answer in QA]
    rows += [(question, CODE_INPUTS.get(question, ""), answer) for question, answer in CODE]
    rows += [("把下面的句子翻译成英文。", zh, en) for zh, en in TRANSLATE_TO_EN]
    rows += [("把下面的句子翻译成中文。", en, zh) for en, zh in TRANSLATE_TO_ZH]
    rows += REWRITE
    rows += [("用一句话概括下面这段话。", text, summary) for text, summary in SUMMARIZE]
    rows += [("判断下面这句评论的情感倾向（正面、负面或中性）。", text, f"{label}。") for text, label in SENTIMENT]
    rows += [("判断下面这条新闻属于哪个类别。", text, f"{label}。") for text, label in TOPICS]
    rows += [(question, "", answer) for question, answer in BRAINSTORM]
    rows += maths(rng) + conversions(rng) + weekdays(rng) + extraction(rng)
    rng.shuffle(rows)
    return [{"instruction": q, "input": i, "output": a} for q, i, a in rows]


if __name__ == "__main__":
    rows = build()
    OUT.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {OUT}")
